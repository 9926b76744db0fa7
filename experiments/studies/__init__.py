"""One-off studies, apart from the trainer: each a program that measures one question.

- ``cpu_gap``: what makes one gradient and one GAM step faster on a CPU;
- ``count_bad_inputs``: how the library reacts to the bad inputs of the test tables.
"""
