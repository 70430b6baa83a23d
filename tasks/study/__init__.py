"""The flow-vs-ε study (issue 19): does flow matching learn new concepts faster than ε-prediction?

plan.py       the configs of every stage run (base, new data, arms, evals) from one pipeline config
runner.py     the study through the stages (a caller-supplied `run(stage, cfg)`), then the study output + report
collect.py    eval outputs -> counts per (arm, seed, step, concept)
stats.py      bootstrap intervals, steps to a level, differences (numpy only)
analysis.py   counts -> tables and headline numbers, each with an interval
findings.py   the paragraph on what the numbers support, written from them
report.py, plots.py, context.py   the markdown page, its pictures, what it says about the setup
models.py     the random model the preset trains from (built on first use), model sizes
__main__.py   `python -m tasks.study -c ab-study`: the study without Prefect (flows/study.py is the flow)
"""
