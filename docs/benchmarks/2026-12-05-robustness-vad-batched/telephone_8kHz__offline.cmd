+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default --mode offline --perturb rate_hz=8000 --worst 0 --json runs/robustness/vadbatched/telephone_8kHz__offline.json
