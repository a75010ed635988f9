// goclient: an independent ttRPC peer for coco.rpc's tests, built on containerd's Go ttrpc library
// (Debian's golang-github-containerd-ttrpc-dev) in GOPATH mode.
//
//	goclient call ADDR SERVICE METHOD PAYLOAD [TIMEOUT_MS]
//	    one unary call; PAYLOAD is hex, or zeros:N for N zero bytes; prints
//	    {"code":..,"message":..,"payload":"<hex>"}
//	goclient many ADDR SERVICE METHOD N
//	    N concurrent calls on one connection; call i sends field 1 = "call-<i>" and must get the
//	    same bytes back; prints {"ok":N} or exits 1 naming the first mismatch
//	goclient serve SOCKET
//	    serves coco.test.Echo {Echo, Fail, Sleep, Big} on a unix socket, prints "ready", stops when
//	    stdin closes
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// raw is a protobuf message that is already encoded: the payload bytes go on the wire as they are.
type raw struct{ b []byte }

func (r *raw) Reset()                   { r.b = nil }
func (r *raw) String() string           { return hex.EncodeToString(r.b) }
func (*raw) ProtoMessage()              {}
func (r *raw) Marshal() ([]byte, error) { return r.b, nil }
func (r *raw) Unmarshal(b []byte) error { r.b = append([]byte(nil), b...); return nil }

// field1 encodes a message whose field 1 (length-delimited) holds s.
func field1(s string) []byte {
	b := []byte{0x0a}
	n := len(s)
	for n >= 0x80 {
		b = append(b, byte(n)|0x80)
		n >>= 7
	}
	b = append(b, byte(n))
	return append(b, s...)
}

func dial(addr string) *ttrpc.Client {
	network, target := "unix", strings.TrimPrefix(addr, "unix://")
	if strings.HasPrefix(addr, "tcp://") {
		network, target = "tcp", strings.TrimPrefix(addr, "tcp://")
	}
	if strings.HasPrefix(target, "@") {
		target = "\x00" + target[1:]
	}
	conn, err := net.Dial(network, target)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(2)
	}
	return ttrpc.NewClient(conn)
}

func emit(v interface{}) {
	out, _ := json.Marshal(v)
	fmt.Println(string(out))
}

func call(args []string) {
	var payload []byte
	var err error
	if strings.HasPrefix(args[3], "zeros:") {
		n, _ := strconv.Atoi(strings.TrimPrefix(args[3], "zeros:"))
		payload = make([]byte, n)
	} else {
		payload, err = hex.DecodeString(args[3])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "payload:", err)
		os.Exit(2)
	}
	ctx := context.Background()
	if len(args) > 4 {
		ms, _ := strconv.Atoi(args[4])
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(ms)*time.Millisecond)
		defer cancel()
	}
	client := dial(args[0])
	defer client.Close()
	resp := &raw{}
	err = client.Call(ctx, args[1], args[2], &raw{payload}, resp)
	st, _ := status.FromError(err)
	emit(map[string]interface{}{
		"code": int(st.Code()), "message": st.Message(), "payload": hex.EncodeToString(resp.b),
	})
}

func many(args []string) {
	n, _ := strconv.Atoi(args[3])
	client := dial(args[0])
	defer client.Close()
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			want := field1(fmt.Sprintf("call-%d", i))
			resp := &raw{}
			if err := client.Call(context.Background(), args[1], args[2], &raw{want}, resp); err != nil {
				errs <- fmt.Sprintf("call %d: %v", i, err)
			} else if hex.EncodeToString(resp.b) != hex.EncodeToString(want) {
				errs <- fmt.Sprintf("call %d: got %x, want %x", i, resp.b, want)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		fmt.Fprintln(os.Stderr, e)
		os.Exit(1)
	}
	emit(map[string]int{"ok": n})
}

func serve(args []string) {
	server, err := ttrpc.NewServer()
	if err != nil {
		panic(err)
	}
	server.Register("coco.test.Echo", map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			req := &raw{}
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			return req, nil
		},
		"Fail": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			return nil, status.Errorf(codes.PermissionDenied, "denied by the Go peer")
		},
		"Sleep": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
		"Big": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			return &raw{make([]byte, 4<<20+16)}, nil
		},
	})
	l, err := net.Listen("unix", args[0])
	if err != nil {
		panic(err)
	}
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		server.Close()
		os.Exit(0)
	}()
	fmt.Println("ready")
	_ = server.Serve(context.Background(), l)
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: goclient call|many|serve ...")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "call":
		call(os.Args[2:])
	case "many":
		many(os.Args[2:])
	case "serve":
		serve(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
