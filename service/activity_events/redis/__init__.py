"""Everything that speaks Redis: key names, connections, Lua scripts, the event
store and consumer groups."""
