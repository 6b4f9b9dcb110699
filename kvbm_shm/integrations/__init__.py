"""Engine integrations: connectors that run inside inference engines and talk to the service.

`service_link` is engine-agnostic (a client link that tolerates a missing service); `vllm` is
the vLLM KV connector. Each integration imports its engine only when it is used.
"""
