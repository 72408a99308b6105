"""Topics files for jobs/generate_prompts.py: what to ask an LLM for, topic by topic.

A topics YAML holds a ``system_prompt`` (how the question-writer must answer: one JSON object), a ``request``
template with ``{topic}``, ``{description}`` and ``{style}``, a list of ``styles`` (requests cycle through them)
the ``topics`` (``name`` and ``description``) and optionally an ``answer_prefix`` written as the start of
the LLM's answer. ``vegetarian`` names the shipped jobs/topics/vegetarian.yaml.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from rayalign.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Topic:
    name: str
    description: str


@dataclasses.dataclass(frozen=True)
class Topics:
    name: str
    system_prompt: str
    request: str
    styles: tuple[str, ...]
    topics: tuple[Topic, ...]
    answer_prefix: str = ""
    """The start of the LLM's answer, written for it (e.g. ``{"question": "``): a small model then fills in the
    object instead of chatting. The jobs parse ``answer_prefix + generated text``."""

    def request_for(self, index: int, per_topic: int) -> tuple[str, str]:
        """(topic name, user message) of request ``index`` of ``len(topics) * per_topic``: topic by topic, the
        styles taken in turn."""
        topic = self.topics[index // per_topic]
        style = self.styles[(index % per_topic) % len(self.styles)]
        return topic.name, self.request.format(topic=topic.name.replace("_", " "), description=topic.description,
                                               style=style)


def topics_path(name: str) -> Path:
    """``vegetarian`` -> the shipped ``jobs/topics/vegetarian.yaml``; anything else is a path."""
    from rayalign.judge.rubric import shipped_yaml

    return shipped_yaml("topics", name)


def load_topics(name: str) -> Topics:
    """Read a topics file (a shipped name or a path); anything wrong is a ConfigError of one line."""
    path = topics_path(name)
    if not path.is_file():
        raise ConfigError(f"topics.file: {name}: not found (a name in jobs/topics/ or a YAML path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"topics.file: {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"topics.file: {path}: expected a mapping with system_prompt, request and topics")
    for key in ("system_prompt", "request"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ConfigError(f"topics.file: {path}: '{key}' must be a non-empty string")
    styles = data.get("styles", [""])
    if not isinstance(styles, list) or not styles or not all(isinstance(s, str) for s in styles):
        raise ConfigError(f"topics.file: {path}: 'styles' must be a non-empty list of strings")
    raw = data.get("topics")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"topics.file: {path}: 'topics' must be a non-empty list")
    topics = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"].strip():
            raise ConfigError(f"topics.file: {path}: topic {i + 1} needs a 'name'")
        topics.append(Topic(t["name"].strip(), str(t.get("description") or t["name"]).strip()))
    names = [t.name for t in topics]
    if len(set(names)) != len(names):
        raise ConfigError(f"topics.file: {path}: topic names must be unique")
    try:
        data["request"].format(topic="", description="", style="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"topics.file: {path}: 'request' may use only {{topic}}, {{description}} and "
                          f"{{style}} ({type(e).__name__}: {e})") from None
    prefix = data.get("answer_prefix", "")
    if not isinstance(prefix, str):
        raise ConfigError(f"topics.file: {path}: 'answer_prefix' must be a string")
    return Topics(str(data.get("name", path.stem)), " ".join(data["system_prompt"].split()),
                  " ".join(data["request"].split()), tuple(styles), tuple(topics), prefix)
