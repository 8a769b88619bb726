"""The attention methods: Chefer relevance (attention captured in the model's backward, the rows the
model reads picked) and attention rollout; each a PyHealth drop-in."""
