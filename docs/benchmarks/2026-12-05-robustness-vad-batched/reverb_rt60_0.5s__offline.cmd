+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default --mode offline --perturb reverb_rt60_s=0.5 --worst 0 --json runs/robustness/vadbatched/reverb_rt60_0.5s__offline.json
