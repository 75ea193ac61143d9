"""Tools for verl's agent loops.

- :mod:`.search`: :class:`~steppo_verl.tools.search.SearchTool`, the ``search`` tool of the multi-hop QA
  recipe, answering ``{"query_list": [...]}`` with passages from an in-process BM25 index or a Search-R1
  retrieval server. Declared to verl by ``steppo_verl/config/search_tool.yaml``
  (``actor_rollout_ref.rollout.multi_turn.tool_config_path``).

verl imports tools by the ``class_name`` in that yaml, so nothing is re-exported here: importing this
package stays free of verl and of the retrieval stack.
"""
