"""The microbenchmark suite: `python -m peftkern.bench --help`.

Layout: `cases` (each op and the implementations it compares), `steps` (training-step cases),
`sweep` (default sweeps and the timing loop), `measure` (timers, roofline, metadata), `report`
(tables, JSON, plots), `cli` (the command line). Nothing here is imported by `import peftkern`.
"""
