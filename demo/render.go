package demo

import (
	"fmt"
	"io"
	"strings"
)

// ANSI styles, used only when the output is a terminal: a log file or a
// CI console must stay plain text.
const (
	styleBold   = "\x1b[1m"
	styleDim    = "\x1b[2m"
	styleRed    = "\x1b[31m"
	styleGreen  = "\x1b[32m"
	styleYellow = "\x1b[33m"
	styleCyan   = "\x1b[36m"
	styleReset  = "\x1b[0m"
)

// printer writes the demo's narrative. Every line it writes fits in 80
// columns.
type printer struct {
	w     io.Writer
	color bool
}

func (p *printer) paint(style, s string) string {
	if !p.color || style == "" {
		return s
	}
	return style + s + styleReset
}

func (p *printer) printf(format string, args ...any) { fmt.Fprintf(p.w, format, args...) }

func (p *printer) heading(s string) {
	p.printf("\n%s\n", p.paint(styleBold+styleCyan, "== "+s))
}

func (p *printer) say(s string) { p.printf("%s\n", s) }

func (p *printer) note(s string) { p.printf("%s\n", p.paint(styleDim, s)) }

func (p *printer) fail(s string) { p.printf("%s\n", p.paint(styleBold+styleRed, s)) }

func (p *printer) good(s string) { p.printf("%s\n", p.paint(styleGreen, s)) }

func outcomeStyle(o Outcome) string {
	switch o {
	case Allowed:
		return styleGreen
	case Denied:
		return styleRed
	case Audited:
		return styleYellow
	}
	return ""
}

// shortName is the pod name without its namespace, for column headers.
func shortName(pod string) string {
	if _, name, ok := strings.Cut(pod, "/"); ok {
		return name
	}
	return pod
}

const (
	rowLabelWidth = 15
	subCellWidth  = 6
)

// RenderMatrix draws m as one grid: rows are sources, columns destinations,
// and each cell holds one outcome per port. Cells in changed are marked with
// "*". Without colour the output is plain ASCII.
func RenderMatrix(m *Matrix, changed map[Cell]bool, color bool) string {
	p := &printer{color: color}
	var b strings.Builder
	cellWidth := len(m.Ports) * (subCellWidth + 1)
	var legend []string
	for _, port := range m.Ports {
		legend = append(legend, port.String())
	}
	fmt.Fprintf(&b, "  each cell: %s; * changed in this step\n", strings.Join(legend, " then "))
	var line strings.Builder
	// endLine drops the padding after the last cell, which would only
	// show up as trailing spaces in logs and copied output.
	endLine := func() {
		b.WriteString(strings.TrimRight(line.String(), " "))
		b.WriteString("\n")
		line.Reset()
	}
	fmt.Fprintf(&line, "  %-*s", rowLabelWidth, "from \\ to")
	for _, to := range m.Pods {
		fmt.Fprintf(&line, "%-*s", cellWidth, shortName(to))
	}
	endLine()
	fmt.Fprintf(&line, "  %-*s", rowLabelWidth, "")
	for range m.Pods {
		for _, port := range m.Ports {
			fmt.Fprintf(&line, "%-*s", subCellWidth+1, port.Proto)
		}
	}
	endLine()
	for _, from := range m.Pods {
		fmt.Fprintf(&line, "  %-*s", rowLabelWidth, from)
		for _, to := range m.Pods {
			for _, port := range m.Ports {
				if from == to {
					fmt.Fprintf(&line, "%-*s", subCellWidth+1, "-")
					continue
				}
				c := Cell{From: from, To: to, Port: port}
				o, _ := m.Get(c)
				s := o.String()
				if changed[c] {
					s += "*"
				}
				pad := strings.Repeat(" ", max(0, subCellWidth+1-len(s)))
				line.WriteString(p.paint(outcomeStyle(o), s) + pad)
			}
		}
		endLine()
	}
	return b.String()
}
