//go:build linux

package netlab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// inNetns runs fn on an OS thread that has joined the named network
// namespace. Sockets fn creates belong to that namespace for good, and files
// under /proc/thread-self/net and /proc/sys/net it opens show that
// namespace. Goroutines fn starts run elsewhere, in the test's namespace: fn
// must make its system calls itself.
//
// fn runs on a fresh goroutine, so the caller's thread is never touched; if
// the thread cannot return to its namespace it stays locked and Go discards
// it when the goroutine ends.
func inNetns(ns string, fn func() error) error {
	target, err := os.Open(filepath.Join(netnsDir, ns))
	if err != nil {
		return fmt.Errorf("open namespace: %w", err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("setns back from %s: %w", ns, err))
			return // still locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

type nsID struct{ dev, ino uint64 }

func statNS(path string) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsID{}, err
	}
	return nsID{uint64(st.Dev), st.Ino}, nil
}

// pidsInNetns returns the processes (other than this one) whose network
// namespace is one of ids. Zombies have none and are not listed.
func pidsInNetns(ids map[nsID]bool) ([]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	self := os.Getpid()
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid <= 1 {
			continue
		}
		id, err := statNS("/proc/" + e.Name() + "/ns/net")
		if err != nil {
			continue // gone, or a zombie
		}
		if ids[id] {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// killInNetns kills every process in the named namespaces with SIGKILL, and
// the process groups they lead (commands from Host.Command lead their own),
// until none is left or timeout passes. It returns how many processes it
// signalled.
func killInNetns(nss []string, timeout time.Duration) (int, error) {
	ids := map[nsID]bool{}
	for _, ns := range nss {
		if id, err := statNS(filepath.Join(netnsDir, ns)); err == nil {
			ids[id] = true
		}
	}
	if len(ids) == 0 {
		return 0, nil
	}
	signalled := map[int]bool{}
	deadline := time.Now().Add(timeout)
	for {
		pids, err := pidsInNetns(ids)
		if err != nil {
			return len(signalled), err
		}
		if len(pids) == 0 {
			return len(signalled), nil
		}
		if time.Now().After(deadline) {
			return len(signalled), fmt.Errorf("processes %v still run after SIGKILL (stuck in the kernel, say on a dead FUSE mount?)", pids)
		}
		self := syscall.Getpgrp()
		for _, pid := range pids {
			if pg, err := syscall.Getpgid(pid); err == nil && pg == pid && pg != self {
				_ = syscall.Kill(-pg, syscall.SIGKILL)
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
			signalled[pid] = true
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// deleteNetns does what ip netns delete does: it detaches the bind mount that
// keeps the namespace alive and removes the mount point. The kernel destroys
// the namespace, and with it its veths and bridges, once nothing else holds
// it. A namespace that does not exist is not an error.
func deleteNetns(ns string) error {
	path := filepath.Join(netnsDir, ns)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}
