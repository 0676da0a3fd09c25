// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* A TCP round-trip client and byte-echo server in C, for bench/dataplane.py: the same
 * workload as its Python tcp-rr/tcp-serve (one connection, TCP_NODELAY, send N bytes, read
 * the N echoed back), without an interpreter's 10 or so microseconds in every round trip, as
 * netperf's TCP_RR measures. Built by the bench with the system's clang.
 *
 *   rr serve PORT                       echo every connection (one process each)
 *   rr client HOST PORT SIZE COUNT WARMUP
 *                                       print {"count", "p50_us", "p99_us", "mean_us"}
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUF (1 << 20)

static void nodelay(int fd)
{
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int echo(int fd)
{
	static char buf[BUF];
	ssize_t n;

	nodelay(fd);
	while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) {
		for (ssize_t off = 0; off < n;) {
			ssize_t w = send(fd, buf + off, n - off, 0);

			if (w <= 0)
				return 1;
			off += w;
		}
	}
	return n < 0;
}

static int serve(int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0);

	signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 128)) {
		perror("listen");
		return 1;
	}
	printf("{\"ready\": true}\n");
	fflush(stdout);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0)
			continue;
		if (fork() == 0) {
			close(lfd);
			_exit(echo(fd));
		}
		close(fd);
	}
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static int client(const char *host, int port, long size, long count, long warmup)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	char *out = malloc(size), *in = malloc(size);
	double *lat = malloc(sizeof(double) * count), sum = 0;

	if (fd < 0 || !out || !in || !lat || inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
	    connect(fd, (struct sockaddr *)&addr, sizeof(addr))) {
		perror("connect");
		return 1;
	}
	nodelay(fd);
	for (long i = 0; i < size; i++)
		out[i] = (char)('a' + i % 26);
	for (long i = 0; i < warmup + count; i++) {
		double t0 = now();
		long got = 0;

		for (long off = 0; off < size;) {
			ssize_t w = send(fd, out + off, size - off, 0);

			if (w <= 0) {
				perror("send");
				return 1;
			}
			off += w;
		}
		while (got < size) {
			ssize_t n = recv(fd, in + got, size - got, 0);

			if (n <= 0) {
				fprintf(stderr, "echo closed or failed\n");
				return 1;
			}
			got += n;
		}
		if (i == 0 && memcmp(in, out, size)) {
			fprintf(stderr, "bad echo\n");
			return 1;
		}
		if (i >= warmup)
			lat[i - warmup] = now() - t0;
	}
	close(fd);
	for (long i = 0; i < count; i++)
		sum += lat[i];
	qsort(lat, count, sizeof(double), cmp);
	/* the same order statistics as the Python tcp-rr (_latencies) */
	printf("{\"count\": %ld, \"p50_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f}\n", count,
	       lat[count / 2] * 1e6, lat[(long)(count * 0.99)] * 1e6, sum / count * 1e6);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "serve"))
		return serve(atoi(argv[2]));
	if (argc == 7 && !strcmp(argv[1], "client"))
		return client(argv[2], atoi(argv[3]), atol(argv[4]), atol(argv[5]), atol(argv[6]));
	fprintf(stderr, "usage: rr serve PORT | rr client HOST PORT SIZE COUNT WARMUP\n");
	return 2;
}
