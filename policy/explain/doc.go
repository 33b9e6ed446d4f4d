// Package explain answers "would this traffic pass, and which rules
// decided?" from a compiled policy.MapState, through MapState.Lookup: the
// same reference semantics the datapath implements, never a second reading
// of the policies. It also renders verdicts and the connectivity matrix for
// the CLI.
package explain
