"""Synthetic world of facts and the trainer of the bundled ``assets/toy-facts`` model."""

from .world import RELATION_FIRST, SUBJECT_FIRST, Relation, Template, World, make_world

__all__ = ["RELATION_FIRST", "SUBJECT_FIRST", "Relation", "Template", "World", "make_world"]
