/* A stand-in for the CUDA driver (libcuda.so.1) for tests/test_cuda_driver_path.py: the functions
 * fastnorm/csrc/cuda_launch.cpp opens, recording what they were given instead of running anything.
 * Built by the test with the C compiler; loaded through LD_LIBRARY_PATH in a subprocess. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int initialised = 0, modules = 0, launches = 0;
static void* current = 0;
static char last_function[512];
static unsigned last_grid[3], last_block[3];
static void* last_stream = (void*)1;
static int64_t last_params[32];
static int last_count = 0;
static int ptx_has_entry = 0;

int cuInit(unsigned flags) { initialised = flags == 0; return 0; }
int cuDeviceGet(int* device, int ordinal) { *device = ordinal; return 0; }
int cuDeviceGetAttribute(int* value, int attribute, int device) {
  *value = attribute == 75 ? 9 : attribute == 76 ? 0 : -1; /* compute capability 9.0 */
  return 0;
}
int cuDevicePrimaryCtxRetain(void** context, int device) { *context = (void*)(intptr_t)(0x1000 + device); return 0; }
int cuCtxGetCurrent(void** context) { *context = current; return 0; }
int cuCtxSetCurrent(void* context) { current = context; return 0; }
int cuModuleLoadData(void** module, const void* image) {
  if (current == 0) return 201; /* CUDA_ERROR_INVALID_CONTEXT: a module loads into the current context */
  ptx_has_entry = strstr((const char*)image, ".entry") != 0;
  *module = (void*)(intptr_t)(++modules);
  return 0;
}
int cuModuleGetFunction(void** function, void* module, const char* name) {
  snprintf(last_function, sizeof last_function, "%s", name);
  *function = (void*)last_function;
  return 0;
}
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
  if (current == 0 || f != (void*)last_function || shared != 0 || extra != 0) return 1;
  last_grid[0] = gx, last_grid[1] = gy, last_grid[2] = gz;
  last_block[0] = bx, last_block[1] = by, last_block[2] = bz;
  last_stream = stream;
  for (last_count = 0; last_count < 32 && params[last_count] != 0; ++last_count) {
    memcpy(&last_params[last_count], params[last_count], sizeof(int64_t));
  }
  ++launches;
  return 0;
}
int cuGetErrorString(int error, const char** text) { *text = "fake driver error"; return 0; }
int cuStreamIsCapturing(void* stream, int* status) { *status = 0; return 0; }

/* what the test reads back (ctypes) */
int fake_state(int64_t* out) {
  out[0] = initialised, out[1] = modules, out[2] = launches, out[3] = ptx_has_entry, out[4] = (int64_t)(intptr_t)current;
  out[5] = last_grid[0], out[6] = last_grid[1], out[7] = last_grid[2];
  out[8] = last_block[0], out[9] = last_block[1], out[10] = last_block[2];
  out[11] = (int64_t)(intptr_t)last_stream, out[12] = last_count;
  for (int i = 0; i < last_count; ++i) out[13 + i] = last_params[i];
  return 0;
}
const char* fake_function(void) { return last_function; }
