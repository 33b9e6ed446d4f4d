package datapath

// HasTunnelRouting reports whether every rule EnsureTunnelRouting installs
// for these settings is in place in the caller's netns. A tool that runs an
// agent for a while (the demo) removes the routing afterwards only when it
// was not there before: a node's own agent may rely on it.
func HasTunnelRouting(mark, mask uint32, table, priority int) (bool, error) {
	for _, r := range tunnelRules(mark, mask, table, priority) {
		ok, err := hasRule(r)
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}
