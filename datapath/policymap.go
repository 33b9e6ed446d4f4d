package datapath

// PolicyMapEntries is the capacity of the live policy trie (keys over all
// endpoints and both policy generations), which budgets are derived from. A re-opened
// datapath has the size the pinned trie was created with.
func (d *Datapath) PolicyMapEntries() int { return int(d.objs.Policy.MaxEntries()) }
