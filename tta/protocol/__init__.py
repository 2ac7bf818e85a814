"""The evaluation protocol: honest tuning on validation streams and the settings x seeds matrix.

- `tta.protocol.presets`: tuned presets (values chosen by `tta tune` on a validation stream), stored in
  the per-user ``presets`` folder or a path, applied with ``--preset tuned``;
- `tta.protocol.tuning`: grids and the tuning loop (validation streams only);
- `tta.protocol.plan`: a matrix plan (cards x streams x adapters x seeds, in parts) and its cells;
- `tta.protocol.cell`: one cell run (a stream or a cost/memory measurement), with its protocol record;
- `tta.protocol.cost`: step cost relative to the source forward and peak memory of a step;
- `tta.protocol.matrix`: runs the cells of a plan (sequential or on Ray), resumable;
- `tta.protocol.table`: mean +- std over seeds, the Markdown table with its protocol header.

Importing this package imports no torch (the CLI lists and checks plans without it).
"""
