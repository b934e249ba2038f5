/* The Linux test guest's workload and memory checker, run by the initramfs's /init
 * (scripts/linux-guest builds both).
 *
 *   dirtier TOTAL_MIB AREA_MIB RATE [PATTERN]
 *
 * It allocates TOTAL_MIB and writes every 4 KiB page, then forever rewrites RATE random
 * pages a second among the first AREA_MIB (0 = idle) and checks pages against what they
 * must hold. The guest checks its own memory, from inside, after it resumes on the
 * destination: a page lost, stale or torn in transit shows up here, on the serial console.
 * (Lost pages in the guest kernel's own memory show up as an oops or a panic instead; under
 * QEMU before 9.0 with TCG that is what QEMU's own dirty tracking does to a guest whose RAM
 * size is a multiple of 256 KiB: see scripts/lib/qemu.py, tcg_safe_mem.)
 *
 * A page's content follows from its index and generation (how often it was rewritten),
 * kept in a table of its own, so any page can be checked at any time. Every page starts
 * with a header of two 64-bit words (index, generation) and ends with a trailer word; what
 * lies between follows PATTERN:
 *   halfzero (the default) the first half of the page pseudo-random 64-bit words, the
 *            second half zeros: compresses about as much as real memory does (lz4 and
 *            zstd both about 2x), so compression on the path is neither flattered nor
 *            defeated;
 *   numeric  32-bit words holding 16 random bits each (the high 16 bits zero), like an
 *            array of small numbers: lz4 finds no 4-byte repeats and cannot shrink it,
 *            while an entropy coder (zstd) gets about 1.5x;
 *   numeric12 the same with 12 random bits in each 32-bit word: at most 2.67x, which a
 *            bit shuffle (bitshuffle-lz4) comes close to and zstd does not.
 * No page is all zeros under either pattern.
 *
 * Console lines (one "alive" a second; the counters are per second unless said):
 *   dirtier: ready MiB=3072 area=1024 rate=5000 pattern=halfzero fill_ms=9000
 *   dirtier: alive t=12 gen=60000 dirtied=5000 checked=40000 passes=0 bad=0
 *   dirtier: MEMORY CHECK FAILED page=123 gen=4 words=255 holds_page=123 holds_gen=3
 * gen is the total of rewrites so far; passes counts checks of every page; bad counts the
 * failed pages so far (each is rewritten as it should be after its report, so counts once).
 * holds_* decode the header the page actually has: a stale page shows its older generation.
 *
 * Built with:  gcc -O2 -static -o dirtier dirtier.c
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE_SIZE 4096
#define WORDS (PAGE_SIZE / 8)
#define PAGES_PER_MIB ((1 << 20) / PAGE_SIZE)
#define MAGIC 0x766d6967726174ULL /* "vmigrat": a header of zeros is no valid header */
#define NS_PER_SEC 1000000000ULL
/* Dirtying is spread over a second in ticks, as a real workload's is, not one burst. */
#define TICKS_PER_SEC 100
#define TICK_NS (NS_PER_SEC / TICKS_PER_SEC)
/* Checks take at most a quarter of each tick, so the vCPU idles most of the time and
 * leaves the host's cores to the migration (a TCG vCPU is a busy host thread). */
#define CHECK_NS (TICK_NS / 4)
#define CHECK_BATCH 16 /* pages checked between looks at the clock */
#define MAX_REPORTS 10 /* failure lines a second: a serial console is slow */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

static uint64_t xorshift(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

enum pattern { HALFZERO, NUMERIC, NUMERIC12 };
static enum pattern pattern = HALFZERO;
static const char *const pattern_names[] = {"halfzero", "numeric", "numeric12"};

/* Writes page `index` at generation `gen` into `p`: a header (index, generation), the
 * pattern's body, and a trailer that catches a page whose tail came from elsewhere. */
static void fill(uint64_t *p, uint64_t index, uint32_t gen)
{
	/* splitmix64's finaliser, so neighbouring (index, gen) give unrelated streams;
	 * xorshift needs a state that is not zero. */
	uint64_t x = index * 0x9e3779b97f4a7c15ULL + gen;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	x = (x ^ (x >> 31)) | 1;

	p[0] = MAGIC ^ index;
	p[1] = MAGIC ^ gen;
	if (pattern == NUMERIC || pattern == NUMERIC12) {
		/* Two little-endian 32-bit words per 64-bit word, each 16 (or 12) random bits:
		 * one step of the generator serves two 64-bit words, each its own bits of it. */
		const int bits = pattern == NUMERIC ? 16 : 12;
		const uint64_t low = pattern == NUMERIC ? 0x0000ffff0000ffffULL : 0x00000fff00000fffULL;
		for (int k = 2; k < WORDS - 1; k += 2) {
			x = xorshift(x);
			p[k] = x & low;
			if (k + 1 < WORDS - 1)
				p[k + 1] = (x >> bits) & low;
		}
	} else {
		for (int k = 2; k < WORDS / 2; k++)
			p[k] = x = xorshift(x);
		memset(&p[WORDS / 2], 0, (WORDS / 2 - 1) * sizeof *p);
	}
	p[WORDS - 1] = MAGIC ^ (index << 32 | gen);
}

static unsigned long parse(const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);
	if (*s == '\0' || *end != '\0') {
		fprintf(stderr, "dirtier: not a number: %s\n", s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	if (argc != 4 && argc != 5) {
		fprintf(stderr, "usage: dirtier TOTAL_MIB AREA_MIB PAGES_PER_SEC [halfzero|numeric|numeric12]\n");
		return 2;
	}
	if (argc == 5) {
		if (strcmp(argv[4], "numeric") == 0)
			pattern = NUMERIC;
		else if (strcmp(argv[4], "numeric12") == 0)
			pattern = NUMERIC12;
		else if (strcmp(argv[4], "halfzero") != 0) {
			fprintf(stderr, "dirtier: unknown pattern %s (halfzero, numeric or numeric12)\n", argv[4]);
			return 2;
		}
	}
	unsigned long total = parse(argv[1]), area = parse(argv[2]), rate = parse(argv[3]);
	if (total == 0 || area > total) {
		fprintf(stderr, "dirtier: need 0 < TOTAL_MIB and AREA_MIB <= TOTAL_MIB\n");
		return 2;
	}
	/* The console is read live by whoever drives the migration. */
	setvbuf(stdout, NULL, _IOLBF, 0);

	size_t pages = total * PAGES_PER_MIB, area_pages = area * PAGES_PER_MIB;
	uint64_t *mem = mmap(NULL, pages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t *gens = calloc(pages, sizeof *gens);
	if (mem == MAP_FAILED || gens == NULL) {
		fprintf(stderr, "dirtier: cannot allocate %lu MiB\n", total);
		return 1;
	}
	uint64_t start = now_ns();
	for (size_t i = 0; i < pages; i++)
		fill(mem + i * WORDS, i, 0);
	printf("dirtier: ready MiB=%lu area=%lu rate=%lu pattern=%s fill_ms=%llu\n", total, area, rate,
	       pattern_names[pattern], (unsigned long long)((now_ns() - start) / 1000000));

	uint64_t expected[WORDS];
	uint64_t rng = now_ns() | 1;
	unsigned long long rewrites = 0, passes = 0, bad = 0;
	unsigned long dirtied = 0, checked = 0, reports = 0;
	unsigned long quota = 0; /* in 1/TICKS_PER_SEC pages: rates below 100 a second work */
	size_t cursor = 0;       /* checks sweep all pages in order, so every page is seen */
	start = now_ns();
	uint64_t next_tick = start, next_report = start + NS_PER_SEC;
	for (;;) {
		if (area_pages > 0)
			quota += rate;
		for (; quota >= TICKS_PER_SEC; quota -= TICKS_PER_SEC) {
			rng = xorshift(rng);
			size_t i = (rng >> 11) % area_pages;
			fill(mem + i * WORDS, i, ++gens[i]);
			rewrites++;
			dirtied++;
		}

		uint64_t stop = now_ns() + CHECK_NS;
		do {
			for (int n = 0; n < CHECK_BATCH; n++) {
				uint64_t *p = mem + cursor * WORDS;
				fill(expected, cursor, gens[cursor]);
				if (memcmp(p, expected, PAGE_SIZE) != 0) {
					int words = 0;
					for (int k = 0; k < WORDS; k++)
						words += p[k] != expected[k];
					if (reports++ < MAX_REPORTS)
						printf("dirtier: MEMORY CHECK FAILED page=%zu gen=%u words=%d "
						       "holds_page=%llu holds_gen=%llu\n",
						       cursor, gens[cursor], words, (unsigned long long)(p[0] ^ MAGIC),
						       (unsigned long long)(p[1] ^ MAGIC));
					memcpy(p, expected, PAGE_SIZE);
					bad++;
				}
				checked++;
				if (++cursor == pages) {
					cursor = 0;
					passes++;
				}
			}
		} while (now_ns() < stop);

		uint64_t t = now_ns();
		if (t >= next_report) {
			printf("dirtier: alive t=%llu gen=%llu dirtied=%lu checked=%lu passes=%llu bad=%llu\n",
			       (unsigned long long)((t - start) / NS_PER_SEC), rewrites, dirtied, checked, passes, bad);
			dirtied = checked = reports = 0;
			next_report += NS_PER_SEC;
		}
		/* A late tick (host scheduling) is caught up so the rate holds; but more than a
		 * second behind (the guest was paused, or the vCPU cannot keep up), the debt is
		 * dropped rather than paid in a burst. */
		next_tick += TICK_NS;
		if (next_tick + NS_PER_SEC < t)
			next_tick = t;
		if (next_report < t)
			next_report = t + NS_PER_SEC;
		struct timespec until = {next_tick / NS_PER_SEC, next_tick % NS_PER_SEC};
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
	}
}
