+ asr eval ../shared/data/speechocean762 --split dev --decoder beam --model models/default
