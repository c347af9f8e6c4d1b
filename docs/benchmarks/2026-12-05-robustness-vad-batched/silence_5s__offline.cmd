+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default --mode offline --perturb silence_s=5 --limit 20 --worst 0 --json runs/robustness/vadbatched/silence_5s__offline.json
