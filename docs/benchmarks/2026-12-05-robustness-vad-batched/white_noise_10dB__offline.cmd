+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default --mode offline --perturb noise_snr_db=10 --worst 0 --json runs/robustness/vadbatched/white_noise_10dB__offline.json
