"""The spool on disk: the rename protocol, recovery, peers, the watcher, the fsync batcher, crash points for tests."""
