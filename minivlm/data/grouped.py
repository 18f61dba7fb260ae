"""Grouped views of the procedural tasks: one item = every question about one scene.

``shapes_grouped``, ``charts_grouped`` and ``multi_image_grouped`` draw scenes exactly as their
task does (same generator, same scene distribution), then ask *every* question that has one
unambiguous answer on the scene (the task's ``questions_about``) instead of the one the scene
was drawn for. The trainer turns such a list into one shared-prefix sequence
(:func:`minivlm.data.collate.merge_shared_prefix`): the images are encoded once for 3-10
supervised answers, as ``easy_vqa_grouped`` does for easy-VQA. Evaluation keeps the task's own
one-question test split.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from minivlm.data.sample import vqa_sample
from minivlm.data.synthetic import SyntheticDataset


class GroupedQuestions(Dataset):
    """Item ``i``: the scene of ``task[i]`` with every question ``task.questions_about`` finds.

    Args:
        task: a procedural dataset with a ``questions_about(scene) -> [(type, question, answer)]``
            method; its samples carry their ``"scene"``.
        count_questions: ``"all"``: every ``count`` question ``questions_about`` finds (for shapes,
            the count of every kind, so small answers dominate: on 400 training scenes 0 and 1
            were 81% of the answers and 3 and 4 5%, against 49% of 3 and 4 in the test split);
            ``"drawn"``: only the one the scene was drawn for, if it was drawn for a count, so
            the answers follow the task's own distribution.

    Items are lists of one-question samples sharing the same image objects (so the processor
    prepares each image once per item); ids are ``"<task>_grouped/<split>/<i>/<k>"``.
    """

    COUNT_QUESTIONS = ("all", "drawn")

    def __init__(self, task: SyntheticDataset, count_questions: str = "all"):
        if not callable(getattr(task, "questions_about", None)):
            raise TypeError(f"{type(task).__name__} cannot be grouped: it has no questions_about(scene) method")
        if count_questions not in self.COUNT_QUESTIONS:
            raise ValueError(f"count_questions must be one of {self.COUNT_QUESTIONS}; got {count_questions!r}")
        self.task = task
        self.count_questions = count_questions

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        base = self.task[index]
        visuals = [item for item in base["messages"][0]["content"] if item["type"] != "text"]
        prefix = f"{self.task.task}_grouped/{self.task.split}/{range(len(self))[index]}"
        questions = self.task.questions_about(base["scene"])
        if self.count_questions == "drawn":
            drawn = next(item["text"] for item in base["messages"][0]["content"] if item["type"] == "text")
            questions = [q for q in questions if q[0] != "count" or q[1] == drawn]
        return [
            vqa_sample(visuals=visuals, question=question, answer=answer, task=self.task.task,
                       sample_id=f"{prefix}/{k}", question_type=question_type, scene=base["scene"])
            for k, (question_type, question, answer) in enumerate(questions)
        ]

    def __repr__(self) -> str:
        return f"GroupedQuestions({self.task!r})"
