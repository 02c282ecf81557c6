/* Internal hooks of the autotuner (lib/autotune.c). */
#ifndef CLKVQ_AUTOTUNE_H
#define CLKVQ_AUTOTUNE_H

#include "internal.h"

/* Tests only: when set, the tuner adds a copy of the default candidate
 * built to give wrong output, which its verification must reject. */
extern int clkvq_tune_plant_bug_for_tests;

#endif
