"""Method defaults shared by `train`, `calibrate` and `demo` (a light module: no torch import, so `--help` stays fast).

colored-digits, seed 0, N = 128, CFG 3.0 (README history in git): 1,000 adapter steps calibrated on 16 samples per
prompt gave bias 0.117, fidelity 0.920, FID 32.2 (w 1.482); 3,000 steps gave 0.148 / 0.934 / 29.9 on 16 samples per
prompt (w 1.454) and 0.141 / 0.937 / 29.5 on 48 (w 1.403, majority share 0.443 -> 0.467); the weight read off a
quadratic (calibrate.estimate, w 1.394): 0.136 / 0.938 / 29.3. Three seeds: fidelity 0.920 -> 0.936 +- 0.005.
5,000 steps, seeds 2 / 1: fidelity 0.927 -> 0.945 / 0.936 -> 0.940 at CFG 3.0, 0.941 -> 0.959 / 0.945 -> 0.949 at
CFG 7.5 (its weight calibrated there), FID lower at both; training plus calibration 249 s on the idle machine.
"""

ADAPTER_STEPS = 5000  # invdiff-rt recipe: adapter training steps
CALIBRATION_PER_PROMPT = 48  # label-free weight rule: generated samples per prompt at each tried weight
CALIBRATION_MIN_SAMPLES = 480  # ... raised to reach this many in all at each tried weight (few-prompt datasets)
CALIBRATION_PAIRS = 4  # ... and the detector's antithetic pairs per generated sample (calibrate.py)
CALIBRATION_INFERRED_SCORINGS = 240  # ... the reference's pairs: raised to give its inferred rows this many scorings
CALIBRATION_FLAG_WIDTH = 0.5  # ... a pair's flag: the logistic step sigmoid((z - k) / width) of its robust z
CALIBRATION_CENTRE = "base"  # ... the generated samples' cut centred on the base model's own samples (or "training")
