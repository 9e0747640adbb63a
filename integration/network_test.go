package integration

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"golang.org/x/sys/unix"
)

// httpServer serves "hello <name>" on ln until the test ends.
func httpServer(t *testing.T, ln net.Listener, name string) int {
	t.Helper()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", name)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

func listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// testNetns makes a network namespace joined to the host by a veth pair:
// the namespace is 198.51.100.1 (a documentation address: "the
// internet" for the box), the host's end 198.51.100.2. It returns a
// listen function that binds inside the namespace. Removed at the end.
func testNetns(t *testing.T) func(addr string) net.Listener {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace (ip netns)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs the ip command (iproute2)")
	}
	tag := fmt.Sprintf("%x", os.Getpid()&0xffff)
	ns, host, peer := "boxrun-t"+tag, "brt"+tag+"h", "brt"+tag+"n"
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	exec.Command("ip", "netns", "del", ns).Run()
	exec.Command("ip", "link", "del", host).Run()
	run("netns", "add", ns)
	t.Cleanup(func() {
		exec.Command("ip", "netns", "del", ns).Run()
		exec.Command("ip", "link", "del", host).Run()
	})
	run("link", "add", host, "type", "veth", "peer", "name", peer)
	run("link", "set", peer, "netns", ns)
	run("addr", "add", "198.51.100.2/24", "dev", host)
	run("link", "set", host, "up")
	run("-n", ns, "addr", "add", "198.51.100.1/24", "dev", peer)
	run("-n", ns, "link", "set", peer, "up")
	run("-n", ns, "link", "set", "lo", "up")
	return func(addr string) net.Listener {
		t.Helper()
		var ln net.Listener
		var lerr error
		done := make(chan struct{})
		go func() {
			defer close(done)
			runtime.LockOSThread() // the thread ends with this goroutine: never back in the pool
			f, err := os.Open("/var/run/netns/" + ns)
			if err != nil {
				lerr = err
				return
			}
			defer f.Close()
			if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
				lerr = err
				return
			}
			ln, lerr = net.Listen("tcp", addr)
		}()
		<-done
		if lerr != nil {
			t.Fatal(lerr)
		}
		return ln
	}
}

// fetch runs busybox wget in the box and returns its output, or "" and
// the error text when the connection failed.
func fetch(t *testing.T, box *boxrun.Box, url string) (string, string) {
	t.Helper()
	res := sh(t, box, "timeout 10 wget -qO- "+url+" 2>&1; echo \" rc=$?\"") // (wget -T crashes busybox)
	out := strings.TrimSpace(res.Stdout)
	if strings.HasSuffix(out, "rc=0") {
		return strings.TrimSpace(strings.TrimSuffix(out, "rc=0")), ""
	}
	return "", out
}

// TestNetworkIsolation: a box with network reaches "the internet" (a
// server in a namespace at a documentation address) and, of the host,
// only the port it opted into; every other path to the host is closed;
// a Deny rule closes an internet destination.
func TestNetworkIsolation(t *testing.T) {
	nsListen := testNetns(t)
	inet := httpServer(t, nsListen("198.51.100.1:0"), "internet")
	denied := httpServer(t, nsListen("198.51.100.1:0"), "denied")
	allowedHost := httpServer(t, listen(t, "127.0.0.1:0"), "host-allowed")
	closedHost := httpServer(t, listen(t, "127.0.0.1:0"), "host-closed")
	anyHost := httpServer(t, listen(t, "0.0.0.0:0"), "host-any") // on every host address

	box := newBox(t, boxrun.BoxSpec{
		Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1, Network: true,
		NetworkPolicy: boxrun.NetworkPolicy{AllowHostPorts: []int{allowedHost}, Deny: []string{fmt.Sprintf("198.51.100.1:%d", denied)}},
	})
	res := sh(t, box, "ls /sys/class/net; cat /etc/resolv.conf")
	if !strings.Contains(res.Stdout, "eth0") || !strings.Contains(res.Stdout, "nameserver 10.0.2.3") {
		t.Fatalf("network config in the box: %q", res.Stdout)
	}
	if out, err := fetch(t, box, fmt.Sprintf("http://198.51.100.1:%d/", inet)); out != "hello internet" {
		t.Errorf("the internet (198.51.100.1) unreachable: %q", err)
	}
	if out, err := fetch(t, box, fmt.Sprintf("http://10.0.2.2:%d/", allowedHost)); out != "hello host-allowed" {
		t.Errorf("opted-in host port unreachable: %q", err)
	}
	// Every other way to the host, and the denied destination.
	var blocked []string
	blocked = append(blocked,
		fmt.Sprintf("198.51.100.1:%d", denied),
		fmt.Sprintf("10.0.2.2:%d", closedHost), fmt.Sprintf("10.0.2.2:%d", anyHost),
		fmt.Sprintf("10.0.2.3:%d", anyHost), fmt.Sprintf("10.0.2.1:%d", anyHost),
		fmt.Sprintf("198.51.100.2:%d", anyHost), // the host's end of the veth
		"169.254.169.254:80", fmt.Sprintf("0.0.0.0:%d", closedHost), fmt.Sprintf("127.0.0.1:%d", closedHost),
	)
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
			blocked = append(blocked, fmt.Sprintf("%s:%d", ipn.IP, anyHost)) // the host's own addresses
		}
	}
	for _, dst := range blocked {
		if out, _ := fetch(t, box, "http://"+dst+"/"); out != "" {
			t.Errorf("%s reachable from the box: %q", dst, out)
		}
	}
	// DNS is answered by the host side, and never with an address the box
	// may not use.
	res = sh(t, box, "nslookup localhost 10.0.2.3 2>&1; nslookup 2130706433 10.0.2.3 2>&1; true")
	if strings.Contains(res.Stdout, "127.0.0.1") && strings.Count(res.Stdout, "127.0.0.1") > strings.Count(res.Stdout, "Server:") {
		t.Errorf("DNS answered with a loopback address: %q", res.Stdout)
	}
}

// TestPublishedPort: a box's port published on the host's 127.0.0.1
// answers from the host, and is released when the box is removed.
func TestPublishedPort(t *testing.T) {
	ln := listen(t, "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	box := newBox(t, boxrun.BoxSpec{
		Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1, Network: true,
		Ports: []boxrun.Port{{HostPort: port, GuestPort: 8000}},
	})
	if _, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
		t.Fatalf("published port %d not held by the box", port)
	}
	sh(t, box, "mkdir -p /tmp/www && echo -n published > /tmp/www/index.html")
	if _, err := fx.eng.StartExec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"httpd", "-f", "-p", "8000", "-h", "/tmp/www"}}); err != nil {
		t.Fatal(err)
	}
	var body string
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err == nil {
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if body = string(b); body == "published" {
				break
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if body != "published" {
		t.Fatalf("published port answered %q", body)
	}
	if err := fx.eng.Remove(ctxT(t, time.Minute), box.ID, boxrun.Force); err != nil {
		t.Fatal(err)
	}
	l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatalf("port %d not released after remove: %v", port, err)
	}
	l2.Close()
	// A port in use fails the create cleanly.
	busy := listen(t, "127.0.0.1:0")
	defer busy.Close()
	_, err = fx.eng.Create(ctxT(t, time.Minute), boxrun.BoxSpec{
		Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1, Network: true,
		Ports: []boxrun.Port{{HostPort: busy.Addr().(*net.TCPAddr).Port, GuestPort: 80}},
	})
	if boxrun.CodeOf(err) != boxrun.RuntimeError || !strings.Contains(err.Error(), "publish port") {
		t.Errorf("create with a busy port: %v", err)
	}
}
