"""What a run folder tells a reader: the self-contained HTML report (:mod:`.page`) with its figures and
faithfulness section, and the faithfulness of whole stored runs (:mod:`.scores`, ``fastattr evaluate``).
"""
