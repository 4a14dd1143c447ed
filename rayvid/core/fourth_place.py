"""The 4th place's constants (team seefun, iQIYI-VID-2019, test mAP 0.8983), in one place.

Every number here is from their released code (docs/method.md section 1: where the code
and the write-up disagree, the code produced the score; the write-up's values are in the
comments). Plain Python, no numpy: the gate, qFF bands and qFDA defaults are used by the
numpy core, the loss stages and the lr schedule by `rayvid.model`, and the configs of
`rayvid.train` / `rayvid.tune` take their defaults or their "4th place" reference from
here. Nothing else in rayvid writes these numbers down.
"""

from __future__ import annotations

# --- training-time gate: keep a face when det >= 0.7 and quality >= 25 (write-up 0.8 / 30)
GATE_DET_MIN = 0.7
GATE_QUALITY_MIN = 25.0

# --- test-time qFF: W(q) = 0 (q < 0), 0.2 (q < 20), 0.3 (q < 30), 0.6 (q < 40), 1.0
# (the poster puts the last cut at 60: POSTER_BAND_CUTS)
BAND_CUTS = (0.0, 20.0, 30.0, 40.0)
BAND_VALUES = (0.0, 0.2, 0.3, 0.6, 1.0)
POSTER_BAND_CUTS = (0.0, 20.0, 30.0, 60.0)

# --- training-time qFDA: 5 draws; the raw face, the mean of 3, the mean of 5
QFDA_N_DRAWS = 5
QFDA_SIZES = (1, 3, 5)
QFDA_MIX = (0.25, 0.65, 0.10)

# --- losses: "Start" and "Combine" mixes of softmax CE and sigmoid focal loss
START = {"ce": 0.25, "focal": 0.75}
FOCAL = {"focal": 1.0}
COMBINE = {"ce": 0.02, "focal": 0.98}

# --- their schedule, in epochs of a 150-epoch run (batch 512, Adam)
EPOCHS = 150
BATCH_SIZE = 512
WARMUP_EPOCHS = 9  # epochs 1-9: Adam at 2e-5 with Start
WARMUP_LR = 2e-5
LR = 1.5e-4  # epoch 10: a fresh Adam at 1.5e-4 ...
LR_HALVING_EPOCHS = 50  # ... halved every 50 epochs (at epochs 60 and 110, 1-based)
LR_GAMMA = 0.5
FOCAL_FROM_EPOCH = 25  # focal alone from epoch 25
COMBINE_FROM_EPOCH = 100  # Combine from epoch 100 to the end

# The same schedule in fractions of the run (rayvid schedules by fraction of total steps,
# so the shape holds at any data-set size). Epoch e (1-based) starts at (e - 1) / EPOCHS.
WARMUP_FRACTION = WARMUP_EPOCHS / EPOCHS  # 0.06
# The step decay counts from the end of the warm-up, over the remaining steps: progress
# r = (e - 9) / 140 for 0-based epochs 9..149 (rayvid.model.schedules.LRSchedule), so
# halving every 50 epochs is every 50/140 of r (epochs 60 and 110), not 50/150.
STEP_FRACTION = LR_HALVING_EPOCHS / (EPOCHS - WARMUP_EPOCHS - 1)

# Loss stages as (start fraction, weights): Start (covering the warm-up), focal alone from
# epoch 25 (24/150 = 0.16), Combine from epoch 100 (99/150 = 0.66).
LOSS_STAGES = (
    (0.0, START),
    ((FOCAL_FROM_EPOCH - 1) / EPOCHS, FOCAL),
    ((COMBINE_FROM_EPOCH - 1) / EPOCHS, COMBINE),
)
