// The emulation's controls, for the Python harness (ctypes): schedule, SM count, guarded buffers.
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <utility>

#include "emulator.h"

namespace {
std::map<void*, std::pair<void*, size_t>> mappings;  // buffer -> (mapping, its length)
}

extern "C" {

void dllm_emu_configure(int sms, int schedule, int copies_at_issue) {
  dllm_emu::config = dllm_emu::Config{sms, schedule, copies_at_issue != 0};
}

// `bytes` of memory that end (to 16 bytes) at a page no one may touch: a read past the end faults.
void* dllm_emu_alloc(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t length = ((bytes + 15 + page - 1) / page + 1) * page;
  auto* base = static_cast<unsigned char*>(
      mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return nullptr;
  unsigned char* guard = base + length - page;
  mprotect(guard, page, PROT_NONE);
  void* buffer = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(guard - bytes) & ~uintptr_t{15});
  mappings[buffer] = {base, length};
  return buffer;
}

void dllm_emu_free(void* buffer) {
  const auto it = mappings.find(buffer);
  if (it == mappings.end()) return;
  munmap(it->second.first, it->second.second);
  mappings.erase(it);
}
}
