+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default --mode offline --perturb babble_snr_db=10 --worst 0 --json runs/robustness/vadbatched/babble_10dB__offline.json
