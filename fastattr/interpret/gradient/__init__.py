"""The gradient methods: integrated gradients (PyHealth's steps, ``steps="auto"``), IG under GIM's
backward rules, GIM, and DeepLift with its rescale rule; each a PyHealth drop-in."""
