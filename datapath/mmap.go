package datapath

import (
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// mapArray maps the first size bytes of the values of a BPF_F_MMAPABLE
// array into this process, shared and writable.
func mapArray(m *ebpf.Map, name string, size int) ([]byte, error) {
	page := os.Getpagesize()
	mem, err := unix.Mmap(m.FD(), 0, (size+page-1)/page*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", name, err)
	}
	return mem[:size], nil
}

// unmapArray undoes mapArray; nil is fine.
func unmapArray(mem *[]byte) error {
	if *mem == nil {
		return nil
	}
	err := unix.Munmap((*mem)[:cap(*mem)])
	*mem = nil
	return err
}
