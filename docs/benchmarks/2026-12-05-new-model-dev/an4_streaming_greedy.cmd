+ asr eval ../shared/data/an4 --split dev --decoder greedy --mode streaming --model models/default
