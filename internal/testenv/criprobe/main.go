// Command criprobe is the whole program of the images the CRI tests run:
// with arguments it prints them and exits, as a container's command;
// without, it waits for SIGTERM or SIGINT, as a pod's pause container
// does. It is built static, so an image of it needs nothing else.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	if len(os.Args) > 1 {
		fmt.Println(strings.Join(os.Args[1:], " "))
		return
	}
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
