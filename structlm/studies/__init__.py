"""Work over many runs: grids of runs under one budget rule (sweep.py), scaling-law fits
(scaling.py), compute-optimal plans from fits or the paper's points (plan.py), the paper's
tables (report.py) and the accounting printout of one config (info.py).
"""
