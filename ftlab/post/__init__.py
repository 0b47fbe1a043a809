"""After training, in weight space: post-training variants of a run (interpolation toward the base, LiNeS) and the
merging of finished runs (soups, task arithmetic, TIES, DARE, Breadcrumbs). formulas.py holds the per-tensor rules,
weights.py reads a run's export tensor by tensor, variants.py evaluates a run's variants, merge.py builds and
evaluates a merged model. docs/post.md has the commands and the defaults' sources."""
