"""Chat templates, one file per kind (registry :data:`TEMPLATES`): ``chatml`` (minivlm's own,
SmolLM2), ``idefics3`` (SmolVLM / SmolVLM2), ``llava`` (LLaVA-1.5), ``nanovlm``.

A checkpoint saves its template as data (``processor_config.json``: ``"chat_template":
{"kind": ...}``); :func:`template_from_dict` restores it.
"""

from __future__ import annotations

from minivlm.text.templates.base import TEMPLATES, ChatTemplate, template_from_dict, view_order
from minivlm.text.templates.chatml import ChatMLTemplate
from minivlm.text.templates.idefics3 import Idefics3Template, number_words
from minivlm.text.templates.llava import LlavaTemplate
from minivlm.text.templates.nanovlm import NanoVLMTemplate

__all__ = ["TEMPLATES", "ChatMLTemplate", "ChatTemplate", "Idefics3Template", "LlavaTemplate", "NanoVLMTemplate",
           "number_words", "template_from_dict", "view_order"]
