"""Shared by the graph tests: real molecules (drugs, rings and cages, charged atoms, salts and other disconnected
graphs, single atoms, a long chain) and Graphormer's Floyd-Warshall written out as loops."""

UNREACHABLE = 510


def loop_floyd_warshall(adj):
    """Graphormer's algos.pyx floyd_warshall for one graph (adj: N x N truthy nested lists), as nested Python loops
    over lists: (dist, path) as lists of lists."""
    n = len(adj)
    M = [[0 if i == j else (1 if adj[i][j] else UNREACHABLE) for j in range(n)] for i in range(n)]
    P = [[-1] * n for _ in range(n)]
    for k in range(n):
        for i in range(n):
            for j in range(n):
                if M[i][j] > M[i][k] + M[k][j]:
                    M[i][j] = M[i][k] + M[k][j]
                    P[i][j] = k
    for i in range(n):
        for j in range(n):
            if M[i][j] >= UNREACHABLE:
                M[i][j] = P[i][j] = UNREACHABLE
    return M, P


SMILES = (
    "CC(=O)Oc1ccccc1C(=O)O",  # aspirin
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",  # caffeine
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O",  # ibuprofen
    "CC(=O)Nc1ccc(O)cc1",  # paracetamol
    "CC1(C)SC2C(NC(=O)Cc3ccccc3)C(=O)N2C1C(=O)O",  # penicillin G
    "CN1CCC23C4C1CC5=C2C(=C(C=C5)O)OC3C(C=C4)O",  # morphine
    "CC(C)CCCC(C)C1CCC2C1(CCC3C2CC=C4C3(CCC(C4)O)C)C",  # cholesterol
    "c1ccc2ccccc2c1",  # naphthalene
    "C1=CC=CC=C1",  # benzene, Kekule form
    "c1ccncc1",  # pyridine
    "C1CC1",  # cyclopropane
    "C12C3C4C1C5C2C3C45",  # cubane
    "C1C2CC3CC1CC(C2)C3",  # adamantane
    "C1CCC2(CC1)CCCC2",  # spiro[4.5]decane
    "C1CCCCCCCCCCC1",  # cyclododecane
    "CCCCCCCCCCCCCCCCCCCC",  # icosane: diameter 19, past multi_hop_max_dist
    "OCC1OC(O)C(O)C(O)C1O",  # glucose
    "OC(=O)CC(O)(CC(O)=O)C(O)=O",  # citric acid
    "[O-][N+](=O)c1ccccc1",  # nitrobenzene (charged atoms)
    "C[N+](C)(C)C",  # tetramethylammonium
    "CS(=O)(=O)N",  # methanesulfonamide
    "[Na+].[Cl-]",  # salt: two single-atom components
    "CC(=O)[O-].[Na+]",  # sodium acetate
    "F[P-](F)(F)(F)(F)F.[Li+]",  # LiPF6
    "N.N.Cl[Pt]Cl",  # cisplatin written as fragments
    "C",  # methane: one atom
    "O",  # water: one atom
    "[Fe+2]",  # a charged single atom
    "[NH4+]",  # ammonium
    "N#N",
    "O=C=O",
    "C#C",
)
