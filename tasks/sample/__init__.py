"""Sampling from flow-matching SD1.5 checkpoints: schedules, samplers, A1111 prompts, PNG metadata.

Public entry points: ``tasks.sample.main.sample_main`` (what `fm sample` calls),
``tasks.sample.pipeline.generate`` (components -> PIL images) and the pieces they are built from.
"""
