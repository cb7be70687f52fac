"""highway-env traffic: scene sampling, snapshots of the state, and counterfactual rollouts.

The simulator is the ground truth. Everything the question templates state about a scene is read
from a snapshot of the simulator (`Snapshot`) or from rolling copies of it forward (`rollout`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import numpy as np

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
import gymnasium as gym
import highway_env  # noqa: F401  (registers the environments)
from highway_env.vehicle.behavior import IDMVehicle

ACTIONS: tuple[str, ...] = ("LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER")
SCENARIOS: tuple[str, ...] = ("highway", "merge")
SIM_HZ = 15
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 35, 35),
    "blue": (35, 75, 205),
    "green": (40, 150, 55),
    "yellow": (235, 200, 30),
    "white": (236, 236, 236),
    "black": (28, 28, 32),
}
BODY_HEIGHTS: dict[str, float] = {"sedan": 1.45, "SUV": 1.85, "van": 2.4}
BRAKING_ACCEL = -1.0  # m/s^2; below this a vehicle's brake lights are on


@dataclass(frozen=True)
class SceneParams:
    scenario: str
    lanes: int
    vehicles: int
    density: float
    ego_speed: float
    warmup_steps: int  # policy steps (1 s each) of random ego actions before the snapshot
    tail_frames: int  # extra simulator frames so snapshots fall between policy decisions
    env_seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> SceneParams:
        return cls(
            scenario=str(rng.choice(SCENARIOS, p=[0.7, 0.3])),
            lanes=int(rng.integers(2, 5)),
            vehicles=int(rng.integers(8, 28)),
            density=float(rng.uniform(0.8, 2.6)),
            ego_speed=float(rng.uniform(18.0, 30.0)),
            warmup_steps=int(rng.integers(1, 7)),
            tail_frames=int(rng.integers(1, SIM_HZ)),
            env_seed=int(rng.integers(0, 2**31 - 1)),
        )


@dataclass(frozen=True)
class Car:
    """One vehicle at snapshot time, in world coordinates (x along the road, y to the right)."""

    index: int
    x: float
    y: float
    heading: float
    speed: float
    accel: float
    length: float
    width: float
    height: float
    colour: str
    body: str
    lane: tuple[str, str, int]
    target_lane: tuple[str, str, int]

    @property
    def braking(self) -> bool:
        return self.accel < BRAKING_ACCEL

    @property
    def signal(self) -> str | None:
        """`left`/`right` while the vehicle's lane-change manoeuvre is under way."""
        if self.target_lane == self.lane or self.target_lane[:2] != self.lane[:2]:
            return None
        return "left" if self.target_lane[2] < self.lane[2] else "right"


@dataclass
class Snapshot:
    params: SceneParams
    ego: Car
    ego_speed_1s_ago: float
    cars: list[Car]
    lanes: list[LaneGeometry]
    obstacles: list[tuple[float, float]]
    lanes_here: int  # lanes of the ego's road section


@dataclass(frozen=True)
class LaneGeometry:
    """A lane's two border polylines near the ego, sampled every few metres, and their marking types."""

    left: np.ndarray  # (N, 2)
    right: np.ndarray  # (N, 2)
    s: np.ndarray  # (N,) longitudinal coordinate of each sample, for dash phase
    line_types: tuple[int, int]


@dataclass
class RolloutResult:
    action: str
    available: bool
    collided: bool
    collision_time: float | None
    collided_with: int | None
    positions_after: dict[int, tuple[float, float]] = field(default_factory=dict)
    speeds_after: dict[int, float] = field(default_factory=dict)


class World:
    """One highway-env episode, advanced to a random moment and frozen for questioning."""

    def __init__(self, params: SceneParams, rng: np.random.Generator) -> None:
        self.params = params
        config = {
            "lanes_count": params.lanes,
            "vehicles_count": params.vehicles,
            "vehicles_density": params.density,
            "simulation_frequency": SIM_HZ,
            "policy_frequency": 1,
            "duration": 1000,
            "offscreen_rendering": True,
        }
        env_id = "highway-v0" if params.scenario == "highway" else "merge-v1"
        if params.scenario == "merge":
            config = {k: v for k, v in config.items() if k in ("simulation_frequency", "offscreen_rendering")}
        self.env = gym.make(env_id, config=config).unwrapped
        self.env.reset(seed=params.env_seed)
        if params.scenario == "merge":
            self._add_merge_traffic(rng)
        ego = self.env.vehicle
        ego.speed = params.ego_speed
        ego.speed_index = ego.speed_to_index(params.ego_speed)
        ego.target_speed = ego.index_to_speed(ego.speed_index)
        n = len(self.env.road.vehicles)
        self.colours = [str(c) for c in rng.choice(list(COLOURS), size=n)]
        self.bodies = [str(b) for b in rng.choice(list(BODY_HEIGHTS), size=n, p=[0.55, 0.3, 0.15])]
        self._ego_speed_history: list[float] = []
        for _ in range(params.warmup_steps):
            self.step(self._driver_action(rng), SIM_HZ)
        self.step(self._driver_action(rng), params.tail_frames)

    def _driver_action(self, rng: np.random.Generator) -> int:
        """A plausible human driver for the warm-up: random intent, vetoed when clearly unsafe.

        It keeps the ego out of trivially doomed states (most random-action episodes crash within
        seconds in dense traffic) while leaving enough risk for the planning questions.
        """
        ego, road = self.env.vehicle, self.env.road
        front, _ = road.neighbour_vehicles(ego, ego.lane_index)
        close = front is not None and ego.lane_distance_to(front) < 1.2 * max(ego.speed, 1.0) + ego.LENGTH
        wish = str(rng.choice(ACTIONS, p=[0.15, 0.4, 0.15, 0.15, 0.15]))
        if wish in ("LANE_LEFT", "LANE_RIGHT") and not self._lane_free(wish):
            wish = "IDLE"
        if close and wish in ("IDLE", "FASTER"):
            wish = "SLOWER"
        return ACTIONS.index(wish)

    def _lane_free(self, action: str) -> bool:
        if not self.action_available(action):
            return False
        ego, road = self.env.vehicle, self.env.road
        _from, _to, lane_id = ego.lane_index
        target_id = lane_id + (1 if action == "LANE_RIGHT" else -1)
        # mid-lane-change the action is taken from the target lane, so the neighbour of the current
        # lane may not exist (past the road's edge: an IndexError, or lane -1 read as the last): not free
        if not 0 <= target_id < len(road.network.graph[_from][_to]):
            return False
        front, rear = road.neighbour_vehicles(ego, (_from, _to, target_id))
        if front is not None and ego.lane_distance_to(front) < 12.0:
            return False
        return not (rear is not None and -ego.lane_distance_to(rear) < 10.0)

    @classmethod
    def constructed(
        cls,
        lanes: int,
        ego_lane: int,
        ego_speed: float,
        others: list[tuple[int, float, float]],
    ) -> World:
        """A hand-built highway scene: `others` are (lane, metres ahead of the ego, speed) triples."""
        params = SceneParams("highway", lanes, 0, 1.0, ego_speed, 0, 0, 0)
        world = cls(params, np.random.default_rng(0))
        road, ego = world.env.road, world.env.vehicle
        lane = road.network.get_lane(("0", "1", ego_lane))
        ego.position = lane.position(200.0, 0.0)
        ego.heading = lane.heading_at(200.0)
        ego.lane_index = ego.target_lane_index = ("0", "1", ego_lane)
        ego.lane = lane
        ego.speed = ego_speed
        road.vehicles = [ego]
        for other_lane, ahead, speed in others:
            lane_o = road.network.get_lane(("0", "1", other_lane))
            road.vehicles.append(
                IDMVehicle(road, lane_o.position(200.0 + ahead, 0.0), heading=lane_o.heading_at(200.0), speed=speed)
            )
        n = len(road.vehicles)
        world.colours, world.bodies = ["white"] * n, ["sedan"] * n
        return world

    def _add_merge_traffic(self, rng: np.random.Generator) -> None:
        road = self.env.road
        extra = max(0, self.params.vehicles // 3)
        for _ in range(extra):
            lane_index = ("a", "b", int(rng.integers(0, 2))) if rng.random() < 0.8 else ("j", "k", 0)
            lane = road.network.get_lane(lane_index)
            s = float(rng.uniform(0.0, 260.0 if lane_index[0] == "a" else 140.0))
            position = lane.position(s, 0.0)
            if any(np.linalg.norm(v.position - position) < 12.0 for v in road.vehicles):
                continue
            v = IDMVehicle(road, position, heading=lane.heading_at(s), speed=float(rng.uniform(20, 30)))
            v.randomize_behavior()
            road.vehicles.append(v)

    @property
    def crashed(self) -> bool:
        return bool(self.env.vehicle.crashed)

    def step(self, action: int | None, frames: int) -> None:
        env = self.env
        if action is not None:
            env.action_type.act(action)
        for _ in range(frames):
            env.road.act()
            env.road.step(1.0 / SIM_HZ)
            self._ego_speed_history.append(float(env.vehicle.speed))

    def snapshot(self) -> Snapshot:
        road = self.env.road
        ego_vehicle = self.env.vehicle
        cars = [self._car(i, v) for i, v in enumerate(road.vehicles)]
        ego = next(c for c, v in zip(cars, road.vehicles, strict=True) if v is ego_vehicle)
        history = self._ego_speed_history
        ago = history[-SIM_HZ - 1] if len(history) > SIM_HZ else (history[0] if history else ego_vehicle.speed)
        _from, _to, _ = ego_vehicle.lane_index
        return Snapshot(
            params=self.params,
            ego=ego,
            ego_speed_1s_ago=float(ago),
            cars=[c for c in cars if c.index != ego.index],
            lanes=self._lane_geometry(ego_vehicle.position),
            obstacles=[(float(o.position[0]), float(o.position[1])) for o in road.objects],
            lanes_here=len(road.network.graph[_from][_to]),
        )

    def _car(self, index: int, v) -> Car:  # noqa: ANN001 (highway-env vehicle)
        accel = float(v.action.get("acceleration", 0.0)) if isinstance(v.action, dict) else 0.0
        target = getattr(v, "target_lane_index", v.lane_index)
        return Car(
            index=index,
            x=float(v.position[0]),
            y=float(v.position[1]),
            heading=float(v.heading),
            speed=float(v.speed),
            accel=accel,
            length=float(v.LENGTH),
            width=float(v.WIDTH),
            height=BODY_HEIGHTS[self.bodies[index]],
            colour=self.colours[index],
            body=self.bodies[index],
            lane=(str(v.lane_index[0]), str(v.lane_index[1]), int(v.lane_index[2])),
            target_lane=(str(target[0]), str(target[1]), int(target[2])),
        )

    def _lane_geometry(self, centre: np.ndarray, behind: float = 110.0, ahead: float = 160.0) -> list[LaneGeometry]:
        out = []
        for _from, tos in self.env.road.network.graph.items():
            for _to, lanes in tos.items():
                for lane in lanes:
                    s_ego, _ = lane.local_coordinates(centre)
                    lo = max(0.0, s_ego - behind)
                    hi = min(float(lane.length), s_ego + ahead)
                    if hi <= lo:
                        continue
                    s = np.arange(lo, hi, 3.0)
                    s = np.append(s, hi)
                    half = [lane.width_at(si) / 2 for si in s]
                    left = np.array([lane.position(si, -h) for si, h in zip(s, half, strict=True)])
                    right = np.array([lane.position(si, h) for si, h in zip(s, half, strict=True)])
                    out.append(LaneGeometry(left, right, s, (int(lane.line_types[0]), int(lane.line_types[1]))))
        return out

    def action_available(self, action: str) -> bool:
        """Whether highway-env would carry the meta-action out (a lane must exist and be reachable)."""
        ego = self.env.vehicle
        if action not in ("LANE_LEFT", "LANE_RIGHT"):
            return True
        _from, _to, lane_id = ego.target_lane_index
        target = lane_id + (1 if action == "LANE_RIGHT" else -1)
        if not 0 <= target < len(self.env.road.network.graph[_from][_to]):
            return False
        return bool(self.env.road.network.get_lane((_from, _to, target)).is_reachable_from(ego.position))

    def rollout(self, action: str, horizon_s: float) -> RolloutResult:
        """Play `action` now, then IDLE, on a copy of the simulator for `horizon_s` seconds."""
        available = self.action_available(action)
        sim = copy.deepcopy(self.env)
        ego = sim.vehicle
        frames = round(horizon_s * SIM_HZ)
        collided_at = None
        for frame in range(frames):
            if frame % SIM_HZ == 0:
                sim.action_type.act(ACTIONS.index(action) if frame == 0 else ACTIONS.index("IDLE"))
            sim.road.act()
            sim.road.step(1.0 / SIM_HZ)
            if ego.crashed:
                collided_at = (frame + 1) / SIM_HZ
                break
        other = None
        if collided_at is not None:
            others = [
                (float(np.linalg.norm(v.position - ego.position)), i)
                for i, v in enumerate(sim.road.vehicles)
                if v is not ego and v.crashed
            ]
            other = min(others)[1] if others else None
        return RolloutResult(
            action=action,
            available=available,
            collided=collided_at is not None,
            collision_time=collided_at,
            collided_with=other,
            positions_after={i: (float(v.position[0]), float(v.position[1])) for i, v in enumerate(sim.road.vehicles)},
            speeds_after={i: float(v.speed) for i, v in enumerate(sim.road.vehicles)},
        )
