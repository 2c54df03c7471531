"""The simulator: the real scheduler, policies and switch strategies on simulated hardware.

`simulate.simulated_engine` builds an `Engine` whose runtime (`runtime.SimRuntime`) advances a
simulated clock by a cost model (`cost`) of a hardware preset (`hardware`); `driver.drive` feeds it
a workload. `scenario` reproduces the paper's experiment, `calibrate` fits the local CPU's cost
model to the real engine and reports the prediction error.
"""
