// Package flowlog writes flow records to a file as JSON lines, with
// size-based rotation that never splits a line: a line that would cross the
// size limit goes whole into the next file. Rotated files are PATH.1 (newest)
// to PATH.N (oldest); older ones are removed.
package flowlog

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
)

// Config sets where and how much is kept.
type Config struct {
	// Path of the live file.
	Path string
	// MaxSize is the most bytes one file holds; 0 means no rotation.
	MaxSize int64
	// MaxFiles is how many rotated files are kept besides the live one.
	MaxFiles int
	// BufferSize is the write buffer; 0 picks 64 KiB. Lines reach the file
	// on Flush, on rotation and on Close.
	BufferSize int
}

// Writer appends lines to the live file and rotates it. Safe for
// concurrent use.
type Writer struct {
	cfg Config

	mu   sync.Mutex
	f    *os.File
	buf  *bufio.Writer
	size int64 // bytes in the live file, buffered included
	// Rotations counts rotations since Open, for metrics.
	rotations uint64
}

// Open opens (appending) or creates the live file.
func Open(cfg Config) (*Writer, error) {
	if cfg.Path == "" {
		return nil, errors.New("flow log: empty path")
	}
	if cfg.MaxSize < 0 || cfg.MaxFiles < 0 {
		return nil, fmt.Errorf("flow log: negative max size (%d) or max files (%d)", cfg.MaxSize, cfg.MaxFiles)
	}
	if cfg.BufferSize <= 0 {
		cfg.BufferSize = 64 << 10
	}
	w := &Writer{cfg: cfg}
	if err := w.openLive(); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *Writer) openLive() error {
	f, err := os.OpenFile(w.cfg.Path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("flow log: open %s: %w", w.cfg.Path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("flow log: stat %s: %w", w.cfg.Path, err)
	}
	w.f, w.size = f, st.Size()
	if w.buf == nil {
		w.buf = bufio.NewWriterSize(f, w.cfg.BufferSize)
	} else {
		w.buf.Reset(f)
	}
	return nil
}

// WriteLine appends line and a newline. line must not contain a newline.
// A line longer than MaxSize gets a file of its own rather than being cut.
func (w *Writer) WriteLine(line []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return errors.New("flow log: write after close")
	}
	n := int64(len(line)) + 1
	if w.cfg.MaxSize > 0 && w.size > 0 && w.size+n > w.cfg.MaxSize {
		if err := w.rotate(); err != nil {
			return err
		}
	}
	if _, err := w.buf.Write(line); err != nil {
		return fmt.Errorf("flow log: write: %w", err)
	}
	if err := w.buf.WriteByte('\n'); err != nil {
		return fmt.Errorf("flow log: write: %w", err)
	}
	w.size += n
	return nil
}

// rotate shifts PATH.i to PATH.i+1, the live file to PATH.1, and opens a
// new live file. With MaxFiles 0 the live file is truncated instead.
func (w *Writer) rotate() error {
	if err := w.buf.Flush(); err != nil {
		return fmt.Errorf("flow log: flush before rotation: %w", err)
	}
	if err := w.f.Close(); err != nil {
		return fmt.Errorf("flow log: close before rotation: %w", err)
	}
	w.f = nil
	if w.cfg.MaxFiles == 0 {
		if err := os.Truncate(w.cfg.Path, 0); err != nil {
			return fmt.Errorf("flow log: truncate: %w", err)
		}
	} else {
		_ = os.Remove(w.rotated(w.cfg.MaxFiles))
		for i := w.cfg.MaxFiles - 1; i >= 1; i-- {
			if err := os.Rename(w.rotated(i), w.rotated(i+1)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("flow log: rotate: %w", err)
			}
		}
		if err := os.Rename(w.cfg.Path, w.rotated(1)); err != nil {
			return fmt.Errorf("flow log: rotate: %w", err)
		}
	}
	w.rotations++
	return w.openLive()
}

func (w *Writer) rotated(i int) string { return w.cfg.Path + "." + strconv.Itoa(i) }

// Rotations returns how many times the file was rotated.
func (w *Writer) Rotations() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.rotations
}

// Flush writes buffered lines to the file.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	if err := w.buf.Flush(); err != nil {
		return fmt.Errorf("flow log: flush: %w", err)
	}
	return nil
}

// Close flushes and closes the live file.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	ferr := w.buf.Flush()
	cerr := w.f.Close()
	w.f = nil
	if err := errors.Join(ferr, cerr); err != nil {
		return fmt.Errorf("flow log: close: %w", err)
	}
	return nil
}
