"""G3, block files on local disk: the format and the coordinator's bookkeeping of them.

- `format`: the G3 block file format (file header, slot header, checksum), shared by the
  coordinator and the I/O workers; imported as `g3`.
- `index`: one namespace's G3 file as the coordinator tracks it (slots, eviction, recovery).
- `store`: the G3 directory of one instance (locks, files, budget).
- `admission`: the frequency filter that decides which blocks earn a place on disk.
"""
