+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default --mode offline --perturb gain_db=-20 --worst 0 --json runs/robustness/vadbatched/gain_-20dB__offline.json
