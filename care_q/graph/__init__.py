"""The deploy form's op vocabulary (`ops`), its tensor roles (`roles`) and its recorded graph (`trace`).

Nothing is imported here, so `care_q.graph.roles` (which recipes need) loads without torch.
"""
