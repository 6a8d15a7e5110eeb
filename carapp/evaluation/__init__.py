"""How good, and how sure: metrics of a run on a split (evaluate), temperature scaling and answer thresholds
(calibrate), calibration and out-of-distribution arithmetic (trust), and what an answer is (answers)."""
