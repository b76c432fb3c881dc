package lazyfs

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// mountFUSE opens a FUSE connection and mounts it at mountpoint, as
// go-fuse's direct mount does, but keeping the descriptor: it is what a
// later process needs to serve the mount (Conn, Attach). The mount is
// read-only in the VFS and the superblock, nosuid and nodev.
func mountFUSE(mountpoint string, c config) (*os.File, error) {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return nil, err
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	conn := os.NewFile(uintptr(fd), "/dev/fuse")
	data := []string{
		"fd=" + strconv.Itoa(fd),
		"rootmode=" + strconv.FormatUint(uint64(st.Mode&unix.S_IFMT), 8),
		"user_id=" + strconv.Itoa(os.Geteuid()),
		"group_id=" + strconv.Itoa(os.Getegid()),
		"max_read=" + strconv.Itoa(fuse.MAX_KERNEL_WRITE),
		// The kernel checks modes and owners from the index.
		"default_permissions",
	}
	if c.allowOther {
		data = append(data, "allow_other")
	}
	flags := uintptr(unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	if err := unix.Mount(c.fsName, mountpoint, "fuse.shoal", flags, strings.Join(data, ",")); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// connPath gives go-fuse its own duplicate of conn, named the way it takes
// an already mounted connection ("/dev/fd/N"); go-fuse closes it when the
// server ends.
func connPath(conn *os.File) (string, error) {
	fd, err := unix.FcntlInt(conn.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("duplicate FUSE connection: %w", err)
	}
	return "/dev/fd/" + strconv.Itoa(fd), nil
}

// notifyResend is FUSE_NOTIFY_RESEND (Linux 6.9): the kernel puts every
// request that a reader of the connection took but never answered back in
// the queue, to be read again.
const notifyResend = 7

// resendPending asks the kernel to send again the requests the previous
// server of conn read but did not answer (it was killed, or it stopped to
// hand over), so that their callers get answers from this one.
func resendPending(conn *os.File) error {
	// A notification is an out header alone: length, the code in the
	// error field, and unique 0.
	var msg [16]byte
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint32(msg[4:], notifyResend)
	if _, err := unix.Write(int(conn.Fd()), msg[:]); err != nil {
		return fmt.Errorf("ask the kernel to resend pending FUSE requests (needs Linux 6.9): %w", err)
	}
	return nil
}

// pollHack has the kernel learn at once that the mount does not poll. Go
// adds every file it opens to its epoll set, and the first epoll_ctl on a
// FUSE file asks the server (FUSE_POLL) from inside the runtime, where the
// thread cannot be stopped: a garbage collection starting then waits for
// it while the server waits for the collection, and a process that reads
// its own mount deadlocks. go-fuse answers a poll of its magic file with
// ENOSYS, after which the kernel never asks again on this connection.
// (go-fuse does this itself only for mounts it makes.)
func pollHack(mountpoint string) {
	fd, err := unix.Open(mountpoint+"/.go-fuse-epoll-hack", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	_, _ = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
}
