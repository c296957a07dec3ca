"""The web page for people (``avrec web``): a client of the gRPC ranking service.

Modules:

- ``gateway``: the service calls the pages make (``Recommend``, ``Rank``, ``LogEvents``) and
  the errors a person can understand (service down, bad input).
- ``catalogue``: item facts the service does not return (year, genres, poster path), title
  search, and the behaviour rows of the offline table.
- ``similar``: nearest neighbours by text, image and mixed item vectors.
- ``posters``: posters served by item id only, and the generated placeholder tile.
- ``cards``: a service answer turned into cards, with what moved since the last list.
- ``report``: the latest ``avrec evaluate`` report and its inline SVG charts.
- ``app``: the Starlette application and its pages; ``serve``: ``avrec web``.
"""
