+ asr eval ../shared/data/an4 --split dev --decoder greedy --model models/default
