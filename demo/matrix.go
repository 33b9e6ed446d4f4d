package demo

import (
	"fmt"
	"slices"
	"strings"
)

// Outcome is what one probe (or one expectation) says about a cell.
type Outcome uint8

// Outcomes. Audited passes like Allowed, but the agent reported it as AUDIT:
// an audit-mode policy would have dropped it.
const (
	Allowed Outcome = iota
	Denied
	Audited
)

func (o Outcome) String() string {
	switch o {
	case Allowed:
		return "ok"
	case Denied:
		return "DROP"
	case Audited:
		return "audit"
	}
	return fmt.Sprintf("outcome(%d)", uint8(o))
}

// Port is one destination port and protocol every pod serves.
type Port struct {
	Num   uint16
	Proto string // "TCP" or "UDP"
}

func (p Port) String() string { return fmt.Sprintf("%d/%s", p.Num, p.Proto) }

// Cell names one probe: a connection from one pod to another on a port.
type Cell struct {
	From, To string // "namespace/name"
	Port     Port
}

func (c Cell) String() string { return fmt.Sprintf("%s -> %s %s", c.From, c.To, c.Port) }

// Matrix is the outcome of every ordered pair of distinct pods on every
// port. A pod's traffic to itself never leaves its namespace, so the
// datapath cannot see it and the matrix leaves it out.
type Matrix struct {
	Pods  []string
	Ports []Port
	cells map[Cell]Outcome
}

// NewMatrix returns a matrix with every cell Allowed: the state of a node
// where no policy selects any pod.
func NewMatrix(pods []string, ports []Port) *Matrix {
	m := &Matrix{Pods: slices.Clone(pods), Ports: slices.Clone(ports), cells: map[Cell]Outcome{}}
	for _, c := range m.Cells() {
		m.cells[c] = Allowed
	}
	return m
}

// Cells lists the cells in display order: port, then source, then
// destination.
func (m *Matrix) Cells() []Cell {
	var out []Cell
	for _, p := range m.Ports {
		for _, from := range m.Pods {
			for _, to := range m.Pods {
				if from != to {
					out = append(out, Cell{From: from, To: to, Port: p})
				}
			}
		}
	}
	return out
}

// Get returns a cell's outcome; ok is false for cells outside the matrix.
func (m *Matrix) Get(c Cell) (o Outcome, ok bool) {
	o, ok = m.cells[c]
	return o, ok
}

// Set records a cell's outcome. It refuses cells outside the matrix, so a
// typo in an expectation fails loudly instead of being ignored.
func (m *Matrix) Set(c Cell, o Outcome) error {
	if _, ok := m.cells[c]; !ok {
		return fmt.Errorf("cell %s is not in the matrix", c)
	}
	m.cells[c] = o
	return nil
}

// Clone copies m.
func (m *Matrix) Clone() *Matrix {
	n := &Matrix{Pods: slices.Clone(m.Pods), Ports: slices.Clone(m.Ports), cells: make(map[Cell]Outcome, len(m.cells))}
	for c, o := range m.cells {
		n.cells[c] = o
	}
	return n
}

// Change is one line of a step's expectation: every cell it matches gets
// Outcome. "*" in From, To or Port matches anything; To and From may also be
// "namespace/*".
type Change struct {
	From, To, Port string
	Outcome        Outcome
}

func matchName(pattern, name string) bool {
	if pattern == "*" || pattern == name {
		return true
	}
	if ns, ok := strings.CutSuffix(pattern, "/*"); ok {
		return strings.HasPrefix(name, ns+"/")
	}
	return false
}

// Apply returns a copy of m with the changes applied in order, so a later
// change can carve an exception out of an earlier one. A change that
// matches no cell is an error: it would be an expectation that checks
// nothing.
func (m *Matrix) Apply(changes []Change) (*Matrix, error) {
	n := m.Clone()
	for _, ch := range changes {
		hit := false
		for _, c := range n.Cells() {
			if matchName(ch.From, c.From) && matchName(ch.To, c.To) && (ch.Port == "*" || ch.Port == c.Port.String()) {
				n.cells[c] = ch.Outcome
				hit = true
			}
		}
		if !hit {
			return nil, fmt.Errorf("change %s -> %s %s matches no cell", ch.From, ch.To, ch.Port)
		}
	}
	return n, nil
}

// Diff is a cell whose outcome differs between two matrices.
type Diff struct {
	Cell
	Before, After Outcome
}

// Diff lists the cells where other differs from m, in display order. Cells
// missing from either matrix count as differences, so comparing matrices of
// different shapes cannot pass.
func (m *Matrix) Diff(other *Matrix) []Diff {
	var out []Diff
	seen := map[Cell]bool{}
	for _, c := range m.Cells() {
		seen[c] = true
		a := m.cells[c]
		b, ok := other.cells[c]
		if !ok {
			b = 255
		}
		if a != b {
			out = append(out, Diff{Cell: c, Before: a, After: b})
		}
	}
	for _, c := range other.Cells() {
		if !seen[c] {
			out = append(out, Diff{Cell: c, Before: 255, After: other.cells[c]})
		}
	}
	return out
}
