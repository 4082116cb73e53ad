"""Which job goes next, and where. From the bottom up, each module using only
those above it in this list:

- ``limits``: which limits (keys with caps) apply to a connection;
- ``limiter``: the interface that counts their slots, and the in-process limiter;
- ``retry``: the retry policy, as pure functions;
- ``waiting``: deferred jobs waiting for a slot, and who gets a freed one;
- ``routing``: where a job's connection goes (relay, retry relay, mail hosts);
- ``results``: job results written in batches, owed, parked; what a node counts;
- ``scan``: finding due jobs in the TOSEND folders;
- ``connections``: open and idle connections and the slots they hold;
- ``attempts``: one delivery attempt and the result it leads to;
- ``scheduler``: the loop that ties them together.
"""
