"""The diffusion math in one place: noise schedules (schedules.py) and the training objectives (objectives.py).

Training (tasks/train), sampling (tasks/sample), export and eval ask an objective instead of comparing names:
a new objective is one class in objectives.py plus its name in OBJECTIVES.
"""
